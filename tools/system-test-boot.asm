; The VM that libvirt starts inside tools/system-test.py's guest: a boot sector, the first
; sector of the image it boots from. Through the BIOS (INT 13h extended reads, which SeaBIOS
; serves from virtio-blk) it reads the whole disk, SECTORS sectors, and prints on the serial
; port a checksum of every byte, then powers the machine off. A kernel would do the same
; with a driver of its own, but booting one under nested emulation takes many minutes.
;
; Checksum (tools/system-test.py computes the same over the image file): over the disk's
; little-endian 32-bit words w, a = a + w and b = b + a, both modulo 2^32, from 0; printed
; as "INNER-VM: sum " then b and a, each as 8 lower-case hex digits.
;
;     nasm -f bin -D SECTORS=32768 -o boot.bin tools/system-test-boot.asm

bits 16
org 0x7c00

%ifndef SECTORS
%error "define SECTORS, the disk's size in 512-byte sectors (a multiple of 64)"
%endif
CHUNK equ 64                    ; sectors per read: 32 KiB at 1000:0000

start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    mov [drive], dl
    mov si, msg_up
    call puts
    xor ebp, ebp                ; a
    xor edi, edi                ; b
.chunk:
    mov si, dap
    mov ah, 0x42
    mov dl, [drive]
    int 0x13
    jc .error
    mov ax, 0x1000
    mov es, ax
    xor bx, bx
    mov cx, CHUNK * 512 / 4
.word:
    mov eax, [es:bx]
    add ebp, eax
    add edi, ebp
    add bx, 4
    loop .word
    add dword [dap.lba], CHUNK
    adc dword [dap.lba + 4], 0
    sub dword [remaining], CHUNK
    jnz .chunk
    mov si, msg_sum
    call puts
    mov eax, edi
    call puthex
    mov eax, ebp
    call puthex
    mov si, msg_done
    call puts
    ; ACPI power-off of QEMU's i440FX/PIIX4 (PM base 0x600 as SeaBIOS sets it up, S5).
    mov dx, 0x604
    mov ax, 0x2000
    out dx, ax
    jmp .halt
.error:
    mov si, msg_error
    call puts
.halt:
    cli
    hlt
    jmp .halt

; Prints the NUL-terminated string at DS:SI.
puts:
    lodsb
    test al, al
    jz .end
    call putc
    jmp puts
.end:
    ret

; Prints EAX as 8 lower-case hex digits.
puthex:
    mov cx, 8
.digit:
    rol eax, 4
    push eax
    and al, 0x0f
    add al, '0'
    cmp al, '9'
    jbe .out
    add al, 'a' - '9' - 1
.out:
    call putc
    pop eax
    loop .digit
    ret

; Writes AL to COM1 once its transmitter is empty.
putc:
    push dx
    push ax
    mov dx, 0x3fd
.wait:
    in al, dx
    test al, 0x20
    jz .wait
    pop ax
    mov dx, 0x3f8
    out dx, al
    pop dx
    ret

align 4
dap:                            ; INT 13h AH=42h disk address packet
    db 16, 0
    dw CHUNK
    dw 0, 0x1000                ; buffer offset, segment
.lba:
    dq 0
remaining: dd SECTORS
drive: db 0
msg_up: db "INNER-VM: up", 13, 10, 0
msg_sum: db "INNER-VM: sum ", 0
msg_done: db 13, 10, "INNER-VM: done", 13, 10, 0
msg_error: db "INNER-VM: read error", 13, 10, 0

times 510 - ($ - $$) db 0
dw 0xaa55
